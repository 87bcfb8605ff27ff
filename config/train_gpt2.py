# GPT-2 124M from scratch on OpenWebText: nanoGPT's reproduction, and really a GPT (model_type='gpt';
# the seed's version of this file trained a Backpack). Data: python data/openwebtext/prepare.py
# The schedule and sizes are nanoGPT's config/train_gpt2.py; the model and optimizer differ from its run:
# - bias=True (below): biases in every Linear and LayerNorm, as GPT-2; nanoGPT's run uses bias=False;
# - the tanh GELU (GPT-2's gelu_new), the only GELU model.py has; nanoGPT uses the exact GELU;
# - weight decay applies to the Linear matrices only, not to the token and position embeddings
#   (nanoGPT decays every 2-D parameter, embeddings included); see GPT.configure_optimizers;
# - batches are a function of (seed, iteration, micro-step), so the data order is not nanoGPT's.
# Expect a slightly different loss curve (docs/training.md, "Training the large configs").
# 12 sequences x 1024 tokens x 40 micro-steps (5 per GPU on 8 GPUs) = 491,520 tokens per step,
# 600k steps (~295B tokens).
#   torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
# Hardware/time: 8x A100 40GB, about 4 days (nanoGPT's report). Expected val loss ~2.85 (nanoGPT);
# the released GPT-2 scores 3.12 here (config/eval_gpt2.py).

out_dir = 'out-gpt2'
eval_interval = 1000
eval_iters = 200
log_interval = 10

wandb_log = False  # True to log to Weights & Biases (pip install wandb)
wandb_project = 'owt'
wandb_run_name = 'gpt2-124M'

dataset = 'openwebtext'
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 40  # over all ranks: 5 per GPU on 8 GPUs

model_type = 'gpt'
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = True  # GPT-2 has biases (nanoGPT's run: False)

learning_rate = 6e-4
max_iters = 600000
lr_decay_iters = 600000
warmup_iters = 2000
min_lr = 6e-5
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
