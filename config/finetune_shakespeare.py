# nanoGPT's finetuning recipe: GPT-2 XL (1.5B) on Tiny Shakespeare in GPT-2 BPE, 20 steps at a
# constant small learning rate. Prepare the data first: python data/shakespeare/prepare.py
#   python train.py config/finetune_shakespeare.py
#   python sample.py --out_dir=out-shakespeare --start="ROMEO:"
# The Backpack twin (the published Backpack-Small): config/finetune_shakespeare_backpack.py

out_dir = 'out-shakespeare'
eval_interval = 5
eval_iters = 40
always_save_checkpoint = False  # keep only the checkpoint with the best val loss

wandb_log = False
wandb_project = 'shakespeare'
wandb_run_name = 'ft-gpt2-xl'

dataset = 'shakespeare'
init_from = 'gpt2-xl'  # the largest GPT-2; gpt2, gpt2-medium, gpt2-large need less memory
model_type = 'gpt'

# 1 sequence x 32 micro-steps x 1024 tokens = 32,768 tokens per step; the 301,966 training tokens
# are about 9 steps, so 20 steps is a little over two epochs
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

learning_rate = 3e-5  # finetune at a constant, small learning rate
decay_lr = False
