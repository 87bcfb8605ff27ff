# The GPT baseline of config/train_tigerbot.py: same data, sizes (12/12/768) and schedule, really a
# GPT (model_type='gpt'; the seed's version of this file trained a Backpack).
#   torchrun --standalone --nproc_per_node=8 train.py config/train_tigerbot_gpt2.py
# Hardware/time: 8x A100, about a day (estimate, 6*N*D with N = 102M). Expected val loss: not measured yet.
exec(open('config/train_tigerbot.py').read())

model_type = 'gpt'
out_dir = 'out-tigerbot-gpt'
wandb_run_name = 'gpt-small'
