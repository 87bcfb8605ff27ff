# Backpack-Mini (the paper's middle size: 8 layers, 8 heads, d=640, 16 senses; ~104M parameters with
# the GPT-2 vocab) on OpenWebText, with the schedule of config/train_backpack_lm.py (100k steps of
# 524,288 tokens). GPT twin: --model_type=gpt.
#   torchrun --standalone --nproc_per_node=8 train.py config/train_backpack_mini.py
# Time: 6*N*D = 3.3e19 FLOPs, about a day on 8x A100 (estimate, not measured).
# Expected val loss: ~3.2 (an estimate between micro and small, not measured here).
exec(open('config/train_backpack_lm.py').read())

out_dir = 'out-backpack-mini'
wandb_run_name = 'backpack-mini'
model_type = 'backpack'
n_layer = 8
n_head = 8
n_embd = 640
