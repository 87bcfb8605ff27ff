# Evaluate the pretrained GPT-2 XL (1558M) on OpenWebText; nanoGPT reports train 2.56, val 2.54.
#   python train.py config/eval_gpt2_xl.py
exec(open('config/eval_gpt2.py').read())

init_from = 'gpt2-xl'
model_type = 'gpt'
