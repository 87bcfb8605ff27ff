# Backpack-Small as in the paper (Hewitt et al. 2023; docs/architecture.md section 4): 12 layers, 12 heads,
# d=768, 16 senses, sense MLP 4d, context 512, OpenWebText (python data/openwebtext/prepare.py),
# 1024 sequences x 512 tokens = 524,288 tokens per step, 100k steps (~52B tokens).
# Hardware: one node of 8 GPUs (A100/H100 80 GB): 32 sequences x 4 micro-steps per GPU.
#   torchrun --standalone --nproc_per_node=8 train.py config/train_backpack_lm.py
# Time: the paper took 3-4 days on 4x A100-40GB; 6*N*D = 5.3e19 FLOPs, ~1-2 days on 8x A100.
# Expected val loss: ~3.0 (not measured here; nanoGPT's GPT-2 124M is near 3.0 after the same ~52B
# tokens, and the paper's Backpack-Small is a little better than its Transformer twin).

out_dir = 'out-backpack-small'
eval_interval = 1000  # the paper validates every 1000 steps
eval_iters = 200
log_interval = 10

wandb_log = False  # True to log to Weights & Biases (pip install wandb)
wandb_project = 'owt'
wandb_run_name = 'backpack-small'

dataset = 'openwebtext'
block_size = 512  # the paper's context (the model could take 1024: set block_size and halve batch_size)
batch_size = 32
gradient_accumulation_steps = 32  # over all ranks: 4 per GPU on 8 GPUs; 32 x 32 x 512 = 524,288 tokens

model_type = 'backpack'
n_layer = 12
n_head = 12
n_embd = 768
n_senses = 16
sense_intermediate_scale = 4
dropout = 0.1  # the paper's models use dropout 0.1 everywhere
bias = True

learning_rate = 6e-4
max_iters = 100000
lr_decay_iters = 100000
warmup_iters = 1000  # 1% of the steps, as the paper
min_lr = 0.0  # the paper decays (linearly) to 0; ours is cosine
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.999  # the paper's Adam betas
grad_clip = 1.0
