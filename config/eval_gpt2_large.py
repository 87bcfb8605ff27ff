# Evaluate the pretrained GPT-2 Large (774M) on OpenWebText; nanoGPT reports train 2.66, val 2.67.
#   python train.py config/eval_gpt2_large.py
exec(open('config/eval_gpt2.py').read())

init_from = 'gpt2-large'
model_type = 'gpt'
