# A small Backpack on Tiny Shakespeare in GPT-2 BPE tokens, sized for a laptop CPU (2000 iterations,
# about half an hour on 2 cores). Its senses belong to words, not letters, which is what
# docs/looking-inside.md, docs/steering.md and docs/evaluation.md (perplexity) need:
#   python data/shakespeare/prepare.py && python train.py config/train_shakespeare_bpe.py --device=cpu --compile=False
# The 300k training tokens are few for a 50k vocabulary: val loss is best (~4.87) around iteration 1250
# and then rises; ckpt.pt keeps the best (always_save_checkpoint = False).
exec(open('config/train_shakespeare_char.py').read())

out_dir = 'out-shakespeare-bpe'
wandb_run_name = 'backpack-bpe'
dataset = 'shakespeare'
eval_interval = 250
eval_iters = 20
log_interval = 100

batch_size = 8
block_size = 64
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
max_iters = 2000
lr_decay_iters = 2000
