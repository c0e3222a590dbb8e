#!/bin/sh
# A first tej job: say hello, show where it runs, leave a result file.
echo "Hello from $(uname -n), job ${TEJ_JOB_ID}"
python3 -c 'import sys; print("Python", sys.version.split()[0])' > python-version.txt
echo "done" > result.txt
