#!/usr/bin/env bash
# The whole Mini-Chinese-GPT pipeline on the bundled samples, tiny preset, CPU, in a few minutes:
#   clean + tokenize → pretrain → SFT data → SFT → preference data → DPO (LoRA) → perplexity + continuation
#   → answers + medical multiple choice → Hugging Face export + transformers generate → a piped chat with the DPO model.
#
#   bash run_demo.sh                    # outputs in data/, sft_data/, out/ (as the real commands use)
#   DEMO_ROOT=/tmp/demo bash run_demo.sh   # outputs under another folder
#   PRETRAIN_ITERS=300 SFT_ITERS=150 DPO_ITERS=60 bash run_demo.sh   # train longer (defaults: 100, 80, 30)
#
# It stops at the first failing stage and shows that stage's error.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}
ROOT=${DEMO_ROOT:-.}
PRETRAIN_ITERS=${PRETRAIN_ITERS:-100}
SFT_ITERS=${SFT_ITERS:-80}
DPO_ITERS=${DPO_ITERS:-30}
DATA=$ROOT/data/pretrain_data.bin
SFT_CSV=$ROOT/sft_data/sft_data.csv
PRE_OUT=$ROOT/out/pretrain
SFT_OUT=$ROOT/out/sft
DPO_CSV=$ROOT/sft_data/dpo_data.csv
DPO_OUT=$ROOT/out/dpo
HF_OUT=$ROOT/out/hf
mkdir -p "$ROOT/data" "$ROOT/sft_data" "$ROOT/out"
START=$SECONDS

stage() {  # stage NAME COMMAND...: run one stage, report its time, stop the demo if it fails
  local name=$1; shift
  printf '\n==== %s\n$ %s\n' "$name" "$*"
  local t0=$SECONDS
  if ! "$@"; then
    printf '\n==== demo stopped: stage "%s" failed (its error is above)\n' "$name" >&2
    exit 1
  fi
  printf -- '---- %s done in %ss\n' "$name" $((SECONDS - t0))
}

SAMPLE="--corpus medical=data/sample/medical.jsonl --corpus wiki=data/sample/wiki.json --corpus baidubaike=data/sample/baike.jsonl"
stage "1/10 clean (quality rules, near-duplicates) and tokenize the pretraining sample" \
  bash -c "$PYTHON data_clean.py $SAMPLE --out '$ROOT/data/clean' && \
           $PYTHON data_process.py $SAMPLE --val-fraction=0.1 --out '$DATA' --clean '$ROOT/data/clean'"
stage "2/10 pretrain (tiny preset, CPU)" \
  $PYTHON pretrain.py --preset=tiny --data="$DATA" --out_dir="$PRE_OUT" --max_iters="$PRETRAIN_ITERS" \
    --micro_batch_size=8 --grad_accum_steps=1 --seq_len=128 --lr=2e-3 --min_lr=2e-4 --warmup_iters=10 \
    --eval_interval=40 --eval_iters=10 --save_interval=40 --log_interval=20 --overwrite
stage "3/10 build the SFT data" \
  $PYTHON sft_data_process.py --out "$SFT_CSV"
stage "4/10 supervised fine-tuning" \
  $PYTHON sft.py --init_from="$PRE_OUT/ckpt.pt" --data="$SFT_CSV" --out_dir="$SFT_OUT" --max_iters="$SFT_ITERS" \
    --micro_batch_size=3 --grad_accum_steps=1 --seq_len=256 --lr=1e-3 --min_lr=1e-4 --warmup_iters=10 \
    --eval_interval=40 --eval_iters=5 --save_interval=40 --log_interval=20 --overwrite
stage "5/10 build the preference data" \
  $PYTHON dpo_data_process.py --out "$DPO_CSV"
stage "6/10 DPO on the SFT model with LoRA adapters (the reference is the same model, adapters off)" \
  $PYTHON dpo.py --init_from="$SFT_OUT/ckpt.pt" --data="$DPO_CSV" --out_dir="$DPO_OUT" --max_iters="$DPO_ITERS" \
    --lora_rank=8 --lora_alpha=16 --micro_batch_size=4 --grad_accum_steps=1 --lr=5e-3 --min_lr=5e-4 \
    --warmup_iters=0 --beta=0.1 --val_fraction=0.2 --eval_interval=10 --eval_iters=2 --save_interval=10 \
    --log_interval=5 --overwrite
stage "7/10 perplexity, bits per byte and a continuation" \
  $PYTHON eval_pretrain.py --ckpt="$PRE_OUT/ckpt.pt" --data="$ROOT/data/pretrain_val.bin" --max_new_tokens=40
stage "8/10 answers and the bundled medical multiple-choice sample" \
  bash -c "$PYTHON eval.py --ckpt='$SFT_OUT/ckpt.pt' --max_new_tokens=60 && \
           $PYTHON eval.py --ckpt='$SFT_OUT/ckpt.pt' --bench=ceval:data/bench_sample"
stage "9/10 export to Hugging Face; transformers' greedy output must equal ours" \
  bash -c "$PYTHON export_hf.py --ckpt '$SFT_OUT/ckpt.pt' --out '$HF_OUT' && HF_HUB_OFFLINE=1 $PYTHON - '$HF_OUT' '$SFT_OUT/ckpt.pt' <<'EOF'
import copy, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from model import load_model
hf_dir, ckpt = sys.argv[1:]
tok = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True)
hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
prompt = torch.tensor([tok.encode('感冒了应该怎么办？') + [tok.special_tokens['<bos>']]])
# a fixed 20 greedy tokens with <eos> not stopping either side: a tiny model often says <eos> first, and
# comparing two empty answers would prove nothing
hf_model.generation_config.eos_token_id = None   # generate() fills an unset eos_token_id back in from here
greedy = copy.deepcopy(hf_model.generation_config)
greedy.update(max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
hf_model.generation_config.eos_token_id = None   # generate() falls back to it for a None
hf_ids = hf_model.generate(prompt, generation_config=greedy)[0, prompt.shape[1]:].tolist()
ours = load_model(ckpt)[0].generate(prompt, max_new_tokens=20, temperature=0, eos_id=None)[0].tolist()
print('transformers:', hf_ids)
print('model.py:    ', ours)
if len(ours) != 20 or hf_ids != ours:
    sys.exit('error: the exported model generates differently from the checkpoint')
print(f'identical greedy tokens (20, {len(set(ours))} distinct): the export is the same network')
EOF"
stage "10/10 a piped chat exchange with the DPO model (its LoRA checkpoint loads directly)" \
  bash -c "printf '高血压患者平时要注意什么？\n/reset\n什么是糖尿病？\n' | $PYTHON chat.py --ckpt='$DPO_OUT/ckpt.pt' --max_new_tokens=60"

cat <<EOF

==== demo finished in $((SECONDS - START))s. What it made:
  $ROOT/data/clean/report.md                   what cleaning removed and why
  $DATA (+ .json manifest, pretrain_val.bin)   tokenized pretraining sample
  $PRE_OUT/ckpt.pt, metrics.jsonl, loss.png    pretrained tiny model
  $SFT_CSV                                     SFT conversations
  $SFT_OUT/ckpt.pt, metrics.jsonl, loss.png    fine-tuned model
  $DPO_CSV                                     preference pairs
  $DPO_OUT/ckpt.pt, metrics.jsonl              DPO LoRA adapters (on $SFT_OUT/ckpt.pt)
  $HF_OUT/                                     Hugging Face LlamaForCausalLM export
Chat with it:  python chat.py --ckpt=$DPO_OUT/ckpt.pt   (or $SFT_OUT/ckpt.pt, before DPO)
Serve it:      python serve.py --ckpt=$DPO_OUT/ckpt.pt     (OpenAI API under /v1, a chat page at /)
EOF
