# The micro size (6 layers, 6 heads, d=384, 16 senses; ~31M parameters with the 21128-character vocab)
# on CLUE's Chinese corpus, with the data and schedule of config/train_clue_small.py.
#   python data/clue_small/prepare.py --vocab=path/to/vocab.txt
#   torchrun --standalone --nproc_per_node=8 train.py config/train_clue_micro.py
#   python train.py config/train_clue_micro.py      # one GPU: 40 micro-steps per iteration
# Hardware/time: a few hours on 8x A100, about a day on one (estimate from 6*N*D, not measured).
# Expected val loss: not measured yet.
exec(open('config/train_clue_small.py').read())

out_dir = 'out-clue-micro'
wandb_run_name = 'backpack-clue-micro'
model_type = 'backpack'
n_layer = 6
n_head = 6
n_embd = 384
