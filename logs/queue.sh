#!/usr/bin/env bash
# Serial job queue: runs each line of logs/$1.txt once, in order (lines may be appended while it runs),
# logging to logs/<name>.log. Line format: NAME|COMMAND. $2 = "rt" runs jobs at real-time priority.
cd /work/main
q=${1:-queue}; touch logs/$q.done
while true; do
  line=$(grep -v -x -F -f logs/$q.done logs/$q.txt 2>/dev/null | head -1)
  if [ -z "$line" ]; then sleep 20; continue; fi
  name=${line%%|*}; cmd=${line#*|}
  echo "$(date +%T) start $name: $cmd" >> logs/$q.history
  if [ "$2" = rt ]; then chrt -r 10 bash -c "$cmd" > logs/$name.log 2>&1; else bash -c "$cmd" > logs/$name.log 2>&1; fi
  echo "$(date +%T) end $name rc=$?" >> logs/$q.history
  echo "$line" >> logs/$q.done
done
