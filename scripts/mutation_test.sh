#!/usr/bin/env bash
# Mutation testing of the Python layer with mutmut (not part of CI). The files it mutates and the
# tests it runs are the [tool.mutmut] section of pyproject.toml; mutmut works on a copy under
# mutants/ (gitignored) and runs each mutant against the selected tests that reach its function.
#
#   .venv/bin/pip install mutmut                        # once
#   scripts/mutation_test.sh                            # every mutant of the configured files
#   scripts/mutation_test.sh 'cnnlstm_ext.train.guards.*' 'cnnlstm_ext.ops.*'   # some of them
#
# Prints the score per file at the end; `.venv/bin/mutmut results` lists the survivors and
# `.venv/bin/mutmut show NAME` shows one. Results are kept in mutants/: delete it to start over
# (a rerun without names only runs mutants that have no result yet).
# MUTMUT_JOBS sets the number of parallel mutants (default: the number of CPUs). All the configured
# files make about 4700 mutants, hours on 2 cores; the names select a part (fnmatch patterns on
# mutmut's names: package.module.x_function__mutmut_N, methods as xǁClassǁmethod__mutmut_N).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
"$VENV/bin/python" -c "import mutmut" 2>/dev/null \
    || { echo "mutmut is not installed: $VENV/bin/pip install mutmut" >&2; exit 1; }
"$VENV/bin/mutmut" run --max-children "${MUTMUT_JOBS:-$(nproc)}" "$@" \
    | tr '\r' '\n' | grep -v -E '^\s*$|^.\s+(Generating|Running|Listing|Filtering)' || true
"$VENV/bin/python" - "$@" <<'PY'
import fnmatch, json, pathlib, sys
from collections import Counter
# mutmut's exit codes (mutmut/stats.py): 1, 3 killed; 0 survived; 33, 5 no tests; 36, +-24, 152, 255 timeout
STATUS = {1: "killed", 3: "killed", 0: "survived", 33: "no tests", 5: "no tests", 36: "timeout",
          24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", None: "not run"}
patterns = sys.argv[1:]
print(f"{'file':36} {'total':>6} {'killed':>7} {'survived':>9} {'no tests':>9} {'timeout':>8} {'score':>6}")
for meta in sorted(pathlib.Path("mutants").rglob("*.py.meta")):
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    if patterns:
        codes = {k: v for k, v in codes.items() if any(fnmatch.fnmatch(k, p) for p in patterns)}
    if not codes:
        continue
    n = Counter(STATUS.get(c, "other") for c in codes.values())
    run = n["killed"] + n["survived"] + n["no tests"] + n["timeout"]
    score = (n["killed"] + n["timeout"]) / run if run else 0.0
    name = str(meta.relative_to("mutants"))[:-len(".meta")]
    print(f"{name:36} {len(codes):6} {n['killed']:7} {n['survived']:9} {n['no tests']:9} "
          f"{n['timeout']:8} {score:6.1%}" + (f"  (+{n['other'] + n['not run']} other/not run)"
                                                if n["other"] + n["not run"] else ""))
PY
