# Evaluate the pretrained GPT-2 (124M) on OpenWebText (prepare data/openwebtext first):
#   python train.py config/eval_gpt2.py
# Losses nanoGPT reports (train / val): gpt2 3.11 / 3.12, gpt2-medium 2.85 / 2.84,
# gpt2-large 2.66 / 2.67, gpt2-xl 2.56 / 2.54 (the other sizes: config/eval_gpt2_{medium,large,xl}.py).
batch_size = 8
eval_iters = 500  # many batches for a precise estimate
eval_only = True
wandb_log = False
dataset = 'openwebtext'
init_from = 'gpt2'
model_type = 'gpt'
