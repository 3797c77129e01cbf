"""The batch over processes (derived accumulation, errors naming the settings), the launch command, the refusal
of an outside launcher, and a worker's error reaching the launcher."""

import pytest

from tasks.common.config import ConfigError, TrainConfig, load_config
from tasks.train import launch


@pytest.mark.parametrize(("processes", "line"), [
    (1, "total batch 1024 = 32 × 32 × 1 process"),
    (2, "total batch 1024 = 32 × 16 × 2 processes"),
    (8, "total batch 1024 = 32 × 4 × 8 processes"),
])
def test_paper_trains_at_1024_on_1_2_or_8_processes(processes, line):
    cfg = load_config("paper", [f"train.processes={processes}"]).train
    assert cfg.batch_line(launch.world_size(cfg)) == line
    assert cfg.accumulation(processes) == 1024 // (32 * processes)


def test_paper_on_this_cpu_box_is_one_process_of_accumulation_32():
    cfg = load_config("paper").train  # processes: auto, no GPU visible here
    assert cfg.processes == "auto" and launch.world_size(cfg) == 1 and cfg.accumulation(1) == 32


def test_a_batch_the_processes_cannot_make_names_the_settings():
    with pytest.raises(ConfigError, match=r"total_batch_size 1024 is not a multiple of batch_size x processes = "
                                          r"32 x 3 processes = 96"):
        load_config("paper", ["train.processes=3"])
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps 4 disagrees with total_batch_size 1024 = "
                                          r"32 x 32 x 1 process.*leave train.gradient_accumulation_steps unset"):
        load_config("paper", ["train.processes=1", "train.gradient_accumulation_steps=4"])
    assert load_config("paper", ["train.processes=8", "train.gradient_accumulation_steps=4"]).train.processes == 8
    # `auto` is checked when the processes are known: at the flow's start, with the same message
    with pytest.raises(ValueError, match="not a multiple"):
        TrainConfig(batch_size=32, total_batch_size=1024).accumulation(3)
    with pytest.raises(ConfigError, match=r"4 x 2 processes = 8"):  # 1 process on each of 2 nodes
        load_config("demo", ["train.nodes=2", "train.processes=1", "train.batch_size=4", "train.total_batch_size=4",
                             "train.rdzv_endpoint=h:1"])


def test_launch_commands_for_one_node_and_for_node_k_of_several(monkeypatch, tmp_path):
    spec = tmp_path / "spec.json"
    one = launch.torchrun_command(TrainConfig(processes=4, total_batch_size=128, device="cuda"), spec)
    assert one[1:] == ["-m", "torch.distributed.run", "--nproc-per-node", "4", "--max-restarts", "0", "--standalone",
                       "-m", "tasks.train.worker", str(spec)]
    two = TrainConfig(processes=8, nodes=2, total_batch_size=1024, rdzv_endpoint="train-0.editforge-train:29500")
    assert launch.torchrun_command(two, spec, node_rank=1)[5:-3] == [
        "--max-restarts", "0", "--nnodes", "2", "--node-rank", "1", "--master-addr", "train-0.editforge-train",
        "--master-port", "29500"]
    monkeypatch.delenv(launch.RDZV_ENV, raising=False)
    lost = two.model_copy(update={"rdzv_endpoint": None})
    with pytest.raises(ValueError, match=r"train.nodes=2 needs train.rdzv_endpoint \(or \$EDITFORGE_RDZV_ENDPOINT\)"):
        launch.check(lost)
    monkeypatch.setenv(launch.RDZV_ENV, "10.0.0.5:29400")
    assert launch.rdzv_endpoint(lost) == ("10.0.0.5", 29400)
    with pytest.raises(ValueError, match="train.device=cuda:1 names one GPU"):
        launch.check(TrainConfig(processes=2, total_batch_size=64, device="cuda:1"))


def test_a_flow_started_by_a_launcher_is_refused_with_the_way_to_run_it():
    launch.refuse_launcher({})
    launch.refuse_launcher({"WORLD_SIZE": "1"})
    for env in ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, {"LOCAL_RANK": "0", "TORCHELASTIC_RUN_ID": "x"}):
        with pytest.raises(launch.LaunchedError, match="the training flow starts its own workers") as err:
            launch.refuse_launcher(env)
    with pytest.raises(launch.LaunchedError, match=r"--set train.processes=2 "):
        launch.refuse_launcher({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    from tasks.common.errors import is_permanent

    assert is_permanent(err.value)


@pytest.mark.component
def test_a_worker_error_reaches_the_launcher_as_that_error(tmp_path):
    """Two processes on shards with a key twice: the main process's ValueError (permanent: no retry), not the
    other process's broken connection."""
    from tasks.common.config import ModelsConfig
    from tasks.pack.shards import write_shard
    from tasks.train.synthetic import synthetic_sample

    urls = []
    for n in range(2):
        urls.append(str(tmp_path / f"train-{n:06d}.tar"))
        write_shard(urls[-1], [synthetic_sample(i, size=32) for i in range(2)])  # the same two keys in both
    cfg = TrainConfig(steps=1, batch_size=1, total_batch_size=2, processes=2, resolution=32, num_workers=0,
                      device="cpu", shuffle_buffer=2)
    with pytest.raises(launch.PermanentWorkerError, match=r"training process 0 failed: sample key "
                                                          r"'synthetic0000-000000_0' appears twice"):
        launch.run_workers(cfg, ModelsConfig(), urls, tmp_path / "work", "k")
