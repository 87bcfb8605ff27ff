# Evaluate the pretrained GPT-2 Medium (350M) on OpenWebText; nanoGPT reports train 2.85, val 2.84.
#   python train.py config/eval_gpt2_medium.py
exec(open('config/eval_gpt2.py').read())

init_from = 'gpt2-medium'
model_type = 'gpt'
