"""stories260K converted with --llama2c generates byte-for-byte what llama2.c's run.c
prints, for every command in $SHARED/models/stories260K-llama2c-greedy.txt."""
import os, re, shlex, subprocess, sys

RUN, SHARED, PY = os.environ.get("RUN", "./run"), os.environ.get("SHARED", "../shared"), os.environ.get("PYTHON", sys.executable)
TMP = os.environ.get("TMPDIR_TESTS", "/tmp")
golden_path = os.path.join(SHARED, "models", "stories260K-llama2c-greedy.txt")
if not os.path.exists(golden_path):
    status = "FAIL" if os.environ.get("CI") == "true" else "skip"
    print(f"{status} stories260K_greedy_matches_llama2c: {golden_path} is missing")
    sys.exit(0)

model = os.path.join(TMP, "stories260K.l3ck")
subprocess.run([PY, "export/export.py", model, "--llama2c", "models/stories260K.bin",
                "--tokenizer", "models/tok512.bin"], check=True, capture_output=True)

golden = open(golden_path, encoding="utf-8").read()
blocks = re.findall(r"^## ([^\n]*)\n----- BEGIN STDOUT -----\n(.*?)----- END STDOUT -----$", golden, re.S | re.M)
assert blocks, "no blocks in the golden file"
for command, expected in blocks:
    args = shlex.split(command)[1:]            # drop ./run
    args = [a for a in args if a != "stories260K.bin"]
    i = args.index("-z"); del args[i:i + 2]    # our model file carries its tokenizer
    got = subprocess.run([RUN, model] + args, capture_output=True).stdout.decode("utf-8", "replace")
    name = "stories260K_greedy_matches_llama2c[" + " ".join(args) + "]"
    if got == expected:
        print("ok", name)
    else:
        k = next((j for j in range(min(len(got), len(expected))) if got[j] != expected[j]), min(len(got), len(expected)))
        print(f"FAIL {name}: first difference at byte {k}: got {got[k:k+40]!r}, expected {expected[k:k+40]!r}")
