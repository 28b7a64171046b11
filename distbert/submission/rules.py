"""The MLPerf Inference rules distbert builds and checks for, by submission round (``--version``).

Each round's checker differs in the LoadGen seeds it requires, where compliance results and the
measurements file go, the code folder's name, the compliance tests and (up to v4.1) whether bert is
a datacenter benchmark. Sources, by round (``mlcommons/inference``; notes/workflow.md has the commits):

* v6.1: ``../shared/MLPERF.md`` (the seeds embedded in LoadGen 6.0.17, verified in its logs);
* v6.0, v5.1, v5.0: ``tools/submission/submission_checker/constants.py`` (seeds, paths; v5.1's seeds
  also in that round's ``loadgen/mlperf.conf``);
* v4.1: ``tools/submission/submission_checker.py`` (seeds, test05 seeds, required scenarios,
  TEST01 + TEST05, mlperf.conf beside the measurements file, the folder rules).

A run made for a round must use that round's seeds: ``distbert run --mlperf-version`` sets them on
LoadGen's ``TestSettings`` after the one ``FromConfig`` (the embedded mlperf.conf holds only the
build's round).
"""

from __future__ import annotations

import dataclasses

from distbert.errors import UserError

#: the round whose seeds LoadGen 6.0.17 embeds (its runs need no override)
LOADGEN_ROUND = "v6.1"


@dataclasses.dataclass(frozen=True)
class Seeds:
    qsl_rng_seed: int
    sample_index_rng_seed: int
    schedule_rng_seed: int

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class RuleSet:
    version: str
    seeds: Seeds
    #: "v6": TEST01 and measurements.json inside results/<system>/<bench>/<scenario>/, code in src/;
    #: "v5": compliance/<system>/... and measurements/<system>/<bench>/<scenario>/<system>_<impl>_<scenario>.json
    #: (+ README.md, user.conf), code in code/; "v4": as v5, plus mlperf.conf beside the measurements file
    layout: str
    #: system_type -> benchmark -> required scenarios (closed/network: exactly these)
    required: dict[str, dict[str, tuple[str, ...]]]
    compliance_tests: tuple[str, ...] = ("TEST01",)
    test05_seeds: Seeds | None = None
    #: Server latency bound the checker compares effective_target_latency_ns with (ns); None: no Server
    server_latency_ns: int | None = None
    #: the default system_type for a bert submission of this round
    default_system_type: str = "edge"
    #: the round's checker rejects a whole submitter folder for a broken link, a file over 50 MB, a
    #: dot-name, a space in a name, a __pycache__ or an empty folder, and the whole tree for a file
    #: beside the division folders (v4.1's single-file checker; the stored v5.x/v6.x package has none)
    folder_rules: bool = False

    @property
    def code_dir(self) -> str:
        return "src" if self.layout == "v6" else "code"

    def scenarios(self, system_type: str, benchmark: str) -> tuple[str, ...]:
        found = self.required.get(system_type, {}).get(benchmark)
        if not found:
            known = ", ".join(f"{t}: {', '.join(sorted(b))}" for t, b in self.required.items())
            raise UserError(f"{self.version} has no {benchmark} result for system_type {system_type!r} "
                            f"(known: {known}): choose another --system-type or --version")
        return found


_EDGE_V5: dict[str, tuple[str, ...]] = {"bert-99": ("Offline", "SingleStream"),
                                        "bert-99.9": ("Offline", "SingleStream")}

RULES: dict[str, RuleSet] = {
    "v6.1": RuleSet("v6.1", Seeds(2085463073848966840, 2747215439041700203, 16159082839903944936), "v6",
                    {"edge": _EDGE_V5, "datacenter,edge": _EDGE_V5}),
    "v6.0": RuleSet("v6.0", Seeds(2465351861681999779, 14276810075590677512, 3936089224930324775), "v6",
                    {"edge": _EDGE_V5, "datacenter,edge": _EDGE_V5}),
    "v5.1": RuleSet("v5.1", Seeds(1780908523862526354, 14771362308971278857, 18209322760996052031), "v5",
                    {"edge": _EDGE_V5, "datacenter,edge": _EDGE_V5}),
    "v5.0": RuleSet("v5.0", Seeds(6023615788873153749, 15036839855038426416, 9933818062894767841), "v5",
                    {"edge": _EDGE_V5, "datacenter,edge": _EDGE_V5}),
    "v4.1": RuleSet("v4.1", Seeds(3066443479025735752, 10688027786191513374, 14962580496156340209), "v4",
                    {"datacenter": {"bert-99": ("Offline", "Server"), "bert-99.9": ("Offline", "Server")},
                     "edge": {"bert-99": ("Offline", "SingleStream")},
                     "datacenter,edge": {"bert-99": ("Offline", "SingleStream", "Server"),
                                         "bert-99.9": ("Offline", "Server")}},
                    compliance_tests=("TEST01", "TEST05"),
                    test05_seeds=Seeds(16799458546791641818, 5453809927556429288, 5435552105434836064),
                    server_latency_ns=130_000_000, default_system_type="datacenter", folder_rules=True),
}


def rules(version: str) -> RuleSet:
    found = RULES.get(version)
    if found is None:
        raise UserError(f"--version {version}: distbert knows {', '.join(RULES)} (the rounds whose checker rules "
                        "and seeds it has)")
    return found
