"""test_vs_llamacpp.py - bench/vs_llamacpp.py without llama.cpp: its refusals (one
"error:" line, exit status 1) and its arithmetic on a results file made up here
(ratios per round and their medians, % roofline and % FMA peak against each
round's own bandwidth and peak, the acceptance lines of issue 15)."""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "bench"))
import vs_llamacpp as V  # noqa: E402
from testlib import Checks, scratch  # noqa: E402

T = Checks()
TMP = scratch("vs-llamacpp-")
SCRIPT = os.path.join(HERE, "..", "bench", "vs_llamacpp.py")


def refused(name, args, message):
    r = subprocess.run([sys.executable, SCRIPT] + args, capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    T.check(name, r.returncode == 1 and lines == ["error: " + message] and not r.stdout,
            f"exit {r.returncode}, stderr {r.stderr.strip()[-300:]!r}")


def refusals():
    refused("vs_llamacpp_without_llama_bench_is_one_error_line", [],
            "--llama-bench PATH is required: llama.cpp's llama-bench (see the top of bench/vs_llamacpp.py)")
    missing = os.path.join(TMP, "no-such-llama-bench")
    refused("vs_llamacpp_missing_llama_bench_file", ["--llama-bench", missing],
            f"--llama-bench {missing}: not an executable file")
    refused("vs_llamacpp_unknown_pair", ["--llama-bench", sys.executable, "--pairs", "q8_0,q5_1"],
            "--pairs q8_0,q5_1: a comma-separated list of q8_0, q4_0, q4_0-e4")
    bad = os.path.join(TMP, "bad.json")
    with open(bad, "w") as f:
        f.write("[1, 2]")
    r = subprocess.run([sys.executable, SCRIPT, "--report", bad], capture_output=True, text=True)
    T.check("vs_llamacpp_report_of_a_wrong_file_is_one_error_line",
            r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: " + bad),
            r.stderr.strip()[-300:])


def made_up_results():
    """Two rounds of the q4_0 pair and of q8_0: the machine, ours and theirs per round."""
    def ours(dec, pre):
        return {"decode": {"forward_tps": dec, "others": 0.05}, "prefill": {"prefill_tps": pre, "others": 0.1}}

    def theirs(tg, pp, size):
        return {"others": 0.2, "tg": {"avg_ts": tg, "model_size": size, "model_type": "llama 1B"},
                "pp": {"avg_ts": pp}}
    info = {"weight_bytes": 800 * 2 ** 20, "matmul_params": 1.2e9}
    return {"args": {"threads": 2, "rounds": 2}, "loadavg": [0.1, 0.2, 0.3], "elapsed_s": 60, "git": {"commit": "abc"},
            "machine": [{"bandwidth_gbs": 30.0, "fma_peak_gflops": 400.0, "vector_unit": "avx512"},
                        {"bandwidth_gbs": 20.0, "fma_peak_gflops": 200.0, "vector_unit": "avx512"}],
            "infos": {"q4_0": info, "q8_0": info},
            "samples": {"q4_0": [{"ours": ours(40.0, 300.0), "theirs": theirs(20.0, 200.0, 700 * 2 ** 20)},
                                 {"ours": ours(30.0, 200.0), "theirs": theirs(25.0, 250.0, 700 * 2 ** 20)}],
                        "q8_0": [{"ours": ours(20.0, 250.0), "theirs": theirs(20.0, 200.0, 1200 * 2 ** 20)},
                                 {"ours": ours(20.0, 150.0), "theirs": theirs(20.0, 200.0, 1200 * 2 ** 20)}]}}


def close(a, b):
    return abs(a - b) <= 1e-9 * max(1.0, abs(b))


def arithmetic():
    res = made_up_results()
    s = V.summarize(res)["q4_0"]
    # per round: 40/20 = 2.0 and 30/25 = 1.2 -> median 1.6 (not the ratio of the medians, 35/22.5)
    T.check("vs_llamacpp_ratios_are_per_round_then_median",
            s["decode_ratio"] == [2.0, 1.2] and close(V.B.median(s["decode_ratio"]), 1.6)
            and s["prefill_ratio"] == [1.5, 0.8], f"{s['decode_ratio']} {s['prefill_ratio']}")
    # medians against the best bandwidth (30 of 30, 20 GB/s) and FMA peak (400 of 400, 200) of the rounds
    roof, fma = 100 * 35 * 800 * 2 ** 20 / 30e9, 100 * 250 * 2 * 1.2e9 / 400e9
    T.check("vs_llamacpp_roofline_and_fma_against_the_best_limits_measured",
            close(s["ours_roofline"], roof) and close(s["ours_fma"], fma)
            and close(s["theirs_roofline"], 100 * 22.5 * 700 * 2 ** 20 / 30e9),
            f"{s['ours_roofline']} vs {roof}, {s['ours_fma']} vs {fma}")
    T.check("vs_llamacpp_others_is_the_most_of_each_engines_runs",
            s["ours_others"] == 0.1 and s["theirs_others"] == 0.2, f"{s['ours_others']} {s['theirs_others']}")
    text = V.report(res)
    want = ["- q4_0 decode >= 1.5x llama.cpp Q4_0's tg64: 1.60x, holds",
            "- q4_0 prefill >= llama.cpp Q4_0's pp128: 1.15x, holds",
            "- q8_0 prefill >= llama.cpp Q8_0's pp128: 1.00x, holds"]
    T.check("vs_llamacpp_report_states_the_acceptance_lines", all(w in text.splitlines() for w in want), text[-800:])
    res["samples"]["q8_0"][1]["ours"]["prefill"]["prefill_tps"] = 130.0  # 0.65 -> median (1.25 + 0.65) / 2 < 1
    T.check("vs_llamacpp_report_says_when_a_line_does_not_hold",
            "- q8_0 prefill >= llama.cpp Q8_0's pp128: 0.95x, does NOT hold" in V.report(res).splitlines(), "")
    # A round disturbed by other programs (others 0.9 > --max-others) is left out while quiet ones exist
    noisy = made_up_results()
    noisy["samples"]["q4_0"].append({"round": 1, "ours": {"decode": {"forward_tps": 10.0, "others": 0.9},
                                                          "prefill": {"prefill_tps": 10.0, "others": 0.0}},
                                     "theirs": noisy["samples"]["q4_0"][0]["theirs"]})
    s = V.summarize(noisy)["q4_0"]
    T.check("vs_llamacpp_noisy_rounds_are_left_out", s["decode_ratio"] == [2.0, 1.2] and s["rounds"] == 2
            and s["rounds_measured"] == 3 and "| 10 % (2/3) |" in V.report(noisy), f"{s['decode_ratio']}")
    for r in noisy["samples"]["q4_0"]:
        r["theirs"]["others"] = 0.5
    s = V.summarize(noisy)["q4_0"]
    T.check("vs_llamacpp_with_no_quiet_round_all_are_used", s["rounds"] == 3 and not s["quiet"]
            and "(3/3, none quiet)" in V.report(noisy), f"{s['rounds']}")
    path = os.path.join(TMP, "res.json")
    with open(path, "w") as f:
        json.dump(res, f)
    r = subprocess.run([sys.executable, SCRIPT, "--report", path], capture_output=True, text=True)
    T.check("vs_llamacpp_report_reprints_a_results_file", r.returncode == 0 and r.stdout.strip() == V.report(res),
            r.stderr[-300:])


def main():
    T.run("vs_llamacpp_refusals", refusals)
    T.run("vs_llamacpp_arithmetic", arithmetic)


if __name__ == "__main__":
    main()
