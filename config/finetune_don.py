# The DI725 course's recipe: finetune the pretrained GPT-2 (124M) on Don Quixote in GPT-2 BPE.
# Data: python data/don/prepare.py (557k train / 59k val tokens, val = 13 held-out chapters)
#   python train.py config/finetune_don.py
#   python sample.py --out_dir=out-don --start="DON QUIXOTE"
# 8 sequences x 4 micro-steps x 1024 tokens = 32,768 tokens per step, ~17 steps per epoch;
# 60 steps is about 3.5 epochs. Hardware/time: one GPU, a few minutes.
# Expected: val loss falls from GPT-2's ~3.4 to about 3.0 (an estimate, not measured here).

out_dir = 'out-don'
eval_interval = 10
eval_iters = 20
log_interval = 1
always_save_checkpoint = False  # keep only the checkpoint with the best val loss

wandb_log = False
wandb_project = 'don'
wandb_run_name = 'ft-gpt2'

dataset = 'don'
init_from = 'gpt2'  # the 124M GPT-2; gpt2-medium/-large/-xl fit the same recipe with more memory
model_type = 'gpt'
dropout = 0.1  # finetuning on little data

batch_size = 8
gradient_accumulation_steps = 4
block_size = 1024
max_iters = 60

learning_rate = 3e-5  # finetune at a constant, small learning rate
decay_lr = False
