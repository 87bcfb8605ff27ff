# A Backpack of the paper's small size (12 layers, 12 heads, d=768, 16 senses) on TigerBot's Chinese
# pretraining corpus, one token per character (BERT Chinese vocab, 21128 tokens). GPT twin:
# config/train_tigerbot_gpt2.py.
#   python data/tigerbot/prepare.py --vocab=path/to/vocab.txt
#   torchrun --standalone --nproc_per_node=8 train.py config/train_tigerbot.py
# 12 x 1024 x 40 (5 per GPU on 8 GPUs) = 491,520 tokens per step, 100k steps ~ 49B tokens.
# Hardware/time: 8x A100, about 1.5 days (estimate from 6*N*D = 4.4e19 FLOPs, N = 148M).
# Expected val loss: not measured yet.
# Same model, batch and schedule as config/train_clue_small.py; only the data and names differ.
# Characters: --sense_norm=rms helped the Backpack on English characters and on a small Chinese sample
# (docs/character-level.md); the default stays the paper's Backpack.
exec(open('config/train_clue_small.py').read())

model_type = 'backpack'
out_dir = 'out-tigerbot-backpack'
wandb_project = 'tigerbot'
wandb_run_name = 'backpack-small'
dataset = 'tigerbot'  # vocab_size comes from its meta.pkl
