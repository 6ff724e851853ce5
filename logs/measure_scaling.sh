#!/usr/bin/env bash
# Pause every other python process, time 1 vs 2 processes (sac.py and ad.py), then resume them.
cd /work/main
others=$(pgrep -f python | grep -v "^$$\$")
echo "pausing: $others"; kill -STOP $others
sleep 2
t0=$(date +%s.%N); python sac.py --env point_goal --steps 1000 --threads 1 --out /tmp/scale_p1 > logs/scale_sac_p1.out 2>&1; t1=$(date +%s.%N)
python -m torch.distributed.run --standalone --nproc_per_node 2 sac.py --env point_goal --steps 1000 --threads 1 --out /tmp/scale_p2 > logs/scale_sac_p2.out 2>&1; t2=$(date +%s.%N)
echo "sac.py point_goal 100 tasks x 1000 steps: 1 process $(echo "$t1 - $t0" | bc) s, torchrun 2 processes $(echo "$t2 - $t1" | bc) s"
A="--env point_goal --threads 1 --epochs 4 --eval-every 100000"
t0=$(date +%s.%N); python ad.py $A --batch-size 16 --out /tmp/scale_ad1 > logs/scale_ad_p1.out 2>&1; t1=$(date +%s.%N)
python -m torch.distributed.run --standalone --nproc_per_node 2 ad.py $A --batch-size 8 --out /tmp/scale_ad2 > logs/scale_ad_p2.out 2>&1; t2=$(date +%s.%N)
echo "ad.py point_goal mamba 120 updates of 16 samples (+1 validation): 1 process $(echo "$t1 - $t0" | bc) s, torchrun 2 processes $(echo "$t2 - $t1" | bc) s"
kill -CONT $others
