# Backpack-Micro (the paper's smallest size: 6 layers, 6 heads, d=384, 16 senses; ~42M parameters with
# the GPT-2 vocab) on OpenWebText, with the schedule of config/train_backpack_lm.py (100k steps of
# 524,288 tokens). GPT twin: --model_type=gpt.
#   torchrun --standalone --nproc_per_node=8 train.py config/train_backpack_micro.py
#   python train.py config/train_backpack_micro.py       # one GPU: 32 micro-steps per iteration
# Time: 6*N*D = 1.3e19 FLOPs, roughly half a day on 8x A100 (estimate, not measured).
# Expected val loss: ~3.5 (an estimate for a model this size, not measured here).
exec(open('config/train_backpack_lm.py').read())

out_dir = 'out-backpack-micro'
wandb_run_name = 'backpack-micro'
model_type = 'backpack'
n_layer = 6
n_head = 6
n_embd = 384
