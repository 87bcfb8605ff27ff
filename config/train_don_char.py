# A small character-level Backpack (23M parameters) on Don Quixote (2.3M characters, 99-symbol vocab), the DI725
# course's dataset, sized like config/train_shakespeare_char.py. Data: python data/don_char/prepare.py
#   python train.py config/train_don_char.py
#   python train.py config/train_don_char.py --device=cpu --compile=False --max_iters=200 --eval_iters=20
#   python sample.py --out_dir=out-don-char --start="DON QUIXOTE"
# Hardware/time: one GPU, a few minutes. Expected val loss: ~1.3 (an estimate from shakespeare_char's
# ~1.5 with twice the text; not measured here).
# Characters: add --sense_norm=rms for a Backpack that learns about as well as its GPT twin (measured on
# Shakespeare characters, docs/character-level.md); the default stays the paper's Backpack.

out_dir = 'out-don-char'
eval_interval = 250
eval_iters = 200
log_interval = 10
always_save_checkpoint = False  # keep only the checkpoint with the best val loss

wandb_log = False
wandb_project = 'don-char'
wandb_run_name = 'backpack'

dataset = 'don_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256  # context of up to 256 previous characters

model_type = 'backpack'
n_layer = 6
n_head = 6
n_embd = 384
n_senses = 16
dropout = 0.2

learning_rate = 1e-3  # small networks can take a larger learning rate
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-4
beta2 = 0.99  # few tokens per iteration
warmup_iters = 100
