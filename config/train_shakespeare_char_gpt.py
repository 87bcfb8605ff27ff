# The GPT baseline twin of config/train_shakespeare_char.py: same data, sizes and schedule.
exec(open('config/train_shakespeare_char.py').read())

model_type = 'gpt'
out_dir = 'out-shakespeare-char-gpt'
wandb_run_name = 'gpt'
