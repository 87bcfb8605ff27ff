# The Backpack twin of config/finetune_shakespeare.py: finetune the published Backpack-Small
# (stanfordnlp/backpack-gpt2, 170M, 512 positions) on Tiny Shakespeare with the same recipe.
#   python train.py config/finetune_shakespeare_backpack.py
exec(open('config/finetune_shakespeare.py').read())

out_dir = 'out-shakespeare-backpack'
wandb_run_name = 'ft-backpack-small'
init_from = 'backpack-small'
model_type = 'backpack'
block_size = 512  # the published Backpack has 512 positions
gradient_accumulation_steps = 64  # 64 x 512 = the same 32,768 tokens per step
