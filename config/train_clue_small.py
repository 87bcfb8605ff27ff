# A Backpack of the paper's small size (12 layers, 12 heads, d=768, 16 senses) on CLUE's Chinese corpus,
# one token per character: the seed project's headline model. Data (BERT Chinese vocab, 21128 tokens):
#   python data/clue_small/prepare.py --vocab=path/to/vocab.txt
#   torchrun --standalone --nproc_per_node=8 train.py config/train_clue_small.py
# 12 x 1024 x 40 (5 per GPU on 8 GPUs) = 491,520 tokens per step; 100k steps ~ 49B tokens, about ten
# passes over the ~5B characters of wiki2019zh + webtext2019zh + news2016zh.
# Hardware/time: 8x A100, about 1.5 days (estimate from 6*N*D = 4.4e19 FLOPs, N = 148M).
# Expected val loss: not measured yet (the seed project reported none).
# Characters: --sense_norm=rms helped the Backpack on English characters and on a small Chinese sample
# (docs/character-level.md); the default stays the paper's Backpack.

out_dir = 'out-clue-small'
eval_interval = 1000
eval_iters = 200
log_interval = 10

wandb_log = False  # True to log to Weights & Biases (pip install wandb)
wandb_project = 'clue'
wandb_run_name = 'backpack-clue-small'

dataset = 'clue_small'  # vocab_size comes from its meta.pkl
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 40

model_type = 'backpack'
n_layer = 12
n_head = 12
n_embd = 768
n_senses = 16
dropout = 0.0
bias = True

learning_rate = 6e-4
max_iters = 100000
lr_decay_iters = 100000
warmup_iters = 2000
min_lr = 6e-5
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
