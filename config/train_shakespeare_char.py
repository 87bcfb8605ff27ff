# A small character-level Backpack on Tiny Shakespeare (GPT twin: config/train_shakespeare_char_gpt.py).
# The README's quick start shrinks it for a CPU (4 layers x 128, context 64, batch 12, dropout 0, 2000
# iterations); measured there: best val loss 2.034 in 137 s on a 2-core CPU (docs/training.md,
# "Shakespeare on a CPU").
# n_senses = 16: the paper's value. With only 65 characters, more senses mean more ways for a
# character to contribute in different contexts; on the quick start's CPU model 16 senses reached val 2.02
# vs 2.14 with 4 (the seed repo's choice), at the same speed (the sense network runs once per distinct id).
# Characters: add --sense_norm=rms for a Backpack that learns about as well as its GPT twin (measured on
# Shakespeare characters, docs/character-level.md); the default stays the paper's Backpack.

out_dir = 'out-shakespeare-char'
eval_interval = 250  # we overfit on this small dataset, so check often
eval_iters = 200
log_interval = 10
always_save_checkpoint = False  # keep only the checkpoint with the best val loss

wandb_log = False
wandb_project = 'shakespeare-char'
wandb_run_name = 'backpack'

dataset = 'shakespeare_char'
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
lr_decay_iters = 5000  # usually max_iters
min_lr = 1e-4  # learning_rate / 10
beta2 = 0.99  # a bit larger than usual since there are few tokens per iteration
warmup_iters = 100
