#!/usr/bin/env bash
# The "planners that see" evidence table (issue 18): every row x seed, WORKERS runs at a time, then the table.
#
#   configs/see/evidence.sh [ROOT]     # ROOT defaults to runs/see; SEEDS="0 1 2" WORKERS=2 PY=.venv/bin/python
#
# The rows, one command each (N = the seed; main = python -m recogdrive_jax.main; every row scores the same 256
# held-out scenes, data.scene_seed 0, whatever the seed). The VLM (SFT + cache) is trained once, with seed V =
# VLM_SEED (default 0): its SFT alone takes ~30 min on a loaded 2-core CPU. Seeds vary the planner (init, batches,
# sampling noise) and, for joint IL, the joint updates of that VLM:
#   (the VLM)             main --config=configs/see/cache_il.py:sft,cache --workdir=ROOT/sV --config.seed=V
#   CV                    main --config=configs/see/cache_il.py:cv --workdir=ROOT/cv
#   scene-token IL        main --config=configs/see/cache_il.py:il_tokens --workdir=ROOT/sN --config.seed=N
#   cache-IL              main --config=configs/see/cache_il.py:il_real --workdir=ROOT/sN --config.seed=N \
#                              --config.data.cache_dir=ROOT/sV/cache
#   cache-IL, shuffled    ... :il_shuffled, the same flags;   cache-IL, zeroed: ... :il_zeros, the same flags
#   joint IL              main --config=configs/see/joint_il.py --workdir=ROOT/sN/joint --config.seed=N \
#                              --config.model.init_from=ROOT/sV/sft     (the SFT'd VLM the cache rows read)
#   OpenTrackVLA, frozen  main --config=configs/see/opentrackvla.py --workdir=ROOT/sN/otvla --config.seed=N
#   OpenTrackVLA, LLM     main --config=configs/see/opentrackvla.py --workdir=ROOT/sN/otvla_llm --config.seed=N \
#                              --config.joint.train_llm=all
# Order: the VLM, then the first seed of every row, then the other seeds of the scene-token / cache / joint rows,
# then those of the OpenTrackVLA rows, the zeroed-feature control last (what is cut when time runs out).
# Wall-clock: pipeline steps from each job's copy of pipeline_summary.json (ROOT/sN/pipeline_summary.<job>.json: the
# jobs of a seed share ROOT/sN), stand-alone runs from WORKDIR/wall.json. Logs and a line per finished job:
# ROOT/logs/. Rerunning skips finished jobs (ROOT/.done/) and resumes unfinished ones from their checkpoints.
set -u
ROOT=${1:-runs/see}
SEEDS=${SEEDS:-0 1 2}
WORKERS=${WORKERS:-2}
VLM_SEED=${VLM_SEED:-0}
PY=${PY:-.venv/bin/python}
CLAIMS=$ROOT/.claims/$$  # this invocation's claims (a failed job is not retried in the same invocation)
mkdir -p "$ROOT/logs" "$CLAIMS" "$ROOT/.done"
V=$ROOT/s$VLM_SEED

main() { "$PY" -m recogdrive_jax.main "$@"; }
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b - a}'; }

run_job() {  # run_job JOB: runs it, logs to ROOT/logs/JOB.log, records wall.json for stand-alone stages
  local job=$1 kind=${1%_s*} n=${1##*_s} wd t0 rc
  t0=$(date +%s.%N)
  case $kind in
    cv) wd=$ROOT/cv; main --config=configs/see/cache_il.py:cv --workdir="$wd" ;;
    vlm) wd=$ROOT/s$n; main --config=configs/see/cache_il.py:sft,cache --workdir="$wd" --config.seed="$n" ;;
    tokens) wd=$ROOT/s$n; main --config=configs/see/cache_il.py:il_tokens --workdir="$wd" --config.seed="$n" ;;
    real|shuffled|zeros) wd=$ROOT/s$n; main --config=configs/see/cache_il.py:il_$kind --workdir="$wd" \
                           --config.seed="$n" --config.data.cache_dir="$V/cache" ;;
    joint) wd=$ROOT/s$n/joint; main --config=configs/see/joint_il.py --workdir="$wd" --config.seed="$n" \
             --config.model.init_from="$V/sft" ;;
    otvla) wd=$ROOT/s$n/otvla; main --config=configs/see/opentrackvla.py --workdir="$wd" --config.seed="$n" ;;
    otvlallm) wd=$ROOT/s$n/otvla_llm; main --config=configs/see/opentrackvla.py --workdir="$wd" \
                --config.seed="$n" --config.joint.train_llm=all ;;
    *) echo "error: unknown job $job" >&2; return 2 ;;
  esac > "$ROOT/logs/$job.log" 2>&1
  rc=$?
  if [ -f "$wd/pipeline_summary.json" ]; then  # pipelines sharing ROOT/sN overwrite it: keep this job's copy
    cp "$wd/pipeline_summary.json" "$wd/pipeline_summary.$job.json"
  elif [ $rc -eq 0 ]; then
    printf '{"wall_s": %s, "job": "%s"}\n' "$(elapsed "$t0")" "$job" > "$wd/wall.json"
  fi
  echo "$(date -u +%H:%M:%S) $job rc=$rc $(elapsed "$t0")s load $(cut -d' ' -f1-3 /proc/loadavg)" \
    >> "$ROOT/logs/jobs.txt"
  return $rc
}

ready() {  # ready JOB: its inputs exist (the SFT'd VLM and its cache) or never will (that job failed)
  case ${1%_s*} in
    real|shuffled|zeros|joint) [ -e "$ROOT/.done/vlm_s$VLM_SEED" ] || [ -e "$CLAIMS/vlm_s$VLM_SEED/failed" ] ;;
    *) true ;;
  esac
}

first=${SEEDS%% *}
rest=${SEEDS#"$first"}
JOBS="vlm_s$VLM_SEED cv_s0"
for k in tokens real shuffled joint otvla otvlallm; do JOBS="$JOBS ${k}_s$first"; done
for n in $rest; do for k in tokens real shuffled joint; do JOBS="$JOBS ${k}_s$n"; done; done
for n in $rest; do for k in otvla otvlallm; do JOBS="$JOBS ${k}_s$n"; done; done
for n in $SEEDS; do JOBS="$JOBS zeros_s$n"; done

worker() {  # takes the first unclaimed job whose inputs exist, until every job is done or claimed
  while :; do
    local left=0 took="" job
    for job in $JOBS; do
      [ -e "$ROOT/.done/$job" ] || [ -d "$CLAIMS/$job" ] && continue
      left=1
      ready "$job" || continue
      if mkdir "$CLAIMS/$job" 2>/dev/null; then took=$job; break; fi
    done
    if [ -n "$took" ]; then
      if run_job "$took"; then touch "$ROOT/.done/$took"; else touch "$CLAIMS/$took/failed"; fi
      continue
    fi
    [ $left -eq 0 ] && return 0
    sleep 20
  done
}

for w in $(seq "$WORKERS"); do worker & done
wait

dirs() { local out=""; for n in $SEEDS; do [ -f "$ROOT/s$n/$1/eval/eval/metrics.json" ] && out="$out,$ROOT/s$n/$1"; done; echo "${out#,}"; }
args=("CV=$ROOT/cv/cv")
for row in "scene-token IL=il_tokens" "cache-IL=il_real" "cache-IL, shuffled=il_shuffled" "cache-IL, zeroed=il_zeros" \
           "joint IL=joint" "OpenTrackVLA, frozen LLM=otvla" "OpenTrackVLA, LLM trained=otvla_llm"; do
  d=$(dirs "${row#*=}"); [ -n "$d" ] && args+=("${row%%=*}=$d")
done
"$PY" -m recogdrive_jax.eval.evidence "${args[@]}" --out "$ROOT/evidence.md"
"$PY" -c 'import json, sys
steps = json.load(open(sys.argv[1]))["steps"]
print("the VLM: " + ", ".join("%s %.1f min" % (s["name"], s["wall_s"] / 60) for s in steps))' "$V/pipeline_summary.vlm_s$VLM_SEED.json"
