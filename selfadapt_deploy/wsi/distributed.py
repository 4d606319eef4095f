"""Blocks of a slide on dask.distributed workers (the ``dask`` extra).

Each worker opens the runner once — a :class:`RunnerPlugin` registered on the cluster builds it
in ``setup`` and keeps it, with the slides it has opened — and every block task reuses them. The
tasks write their results into the run's work directory (a shared filesystem when the workers
are other machines), exactly as the single-process path does; the stitching and the final write
stay in the calling process, band by band. ``local:N`` starts a local cluster of N worker
processes, one thread each.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from selfadapt_deploy.errors import SaDeployError
from selfadapt_deploy.wsi.plan import Block

PLUGIN = "sa-deploy-runner"

try:  # the plugin is a distributed.WorkerPlugin when dask is installed (the `dask` extra)
    from distributed import WorkerPlugin as _WorkerPlugin
except ImportError:  # pragma: no cover - without dask nothing here runs
    _WorkerPlugin = object


def _distributed():
    try:
        import distributed
    except ImportError as exc:
        raise SaDeployError("--dask needs dask.distributed: pip install 'sa-deploy[dask]'") from exc
    return distributed


class RunnerPlugin(_WorkerPlugin):
    """Opens (``open_runner(**runner_args)``) and activates the runner once per worker."""

    name = PLUGIN

    def __init__(self, runner_args: dict):
        self.runner_args = runner_args
        self.runner = None
        self.slides: dict[tuple[str, int | None], object] = {}

    def setup(self, worker=None) -> None:
        from selfadapt_deploy.runner_choice import open_runner
        from selfadapt_deploy.runtime.torch_runner import resolve_device

        args = dict(self.runner_args)  # the device is resolved here: "auto" means this worker's GPU
        args["device"] = resolve_device(str(args.get("device", "auto")))
        self.runner = open_runner(**args)[0]
        self.runner.activate()

    def teardown(self, worker=None) -> None:
        if self.runner is not None:
            self.runner.deactivate()
        for slide in self.slides.values():
            slide.close()

    def slide(self, path: str, series: int | None):
        from selfadapt_deploy.wsi.slide import open_slide

        key = (path, series)
        if key not in self.slides:
            self.slides[key] = open_slide(path, series)
        return self.slides[key]


#: runs one planned block: (work directory, block, the worker's runner, slide opener) → result
BlockExecutor = Callable[[str, Block, object, Callable[[str, int | None], object]], dict]


def block_task(work: str, block: dict, execute: BlockExecutor) -> dict:
    """One block on a worker, with the worker's runner and slides, by the streamer's executor."""
    from distributed import get_worker

    plugin = get_worker().plugins[PLUGIN]
    return execute(work, Block(**block), plugin.runner, plugin.slide)


def run_blocks_on_dask(address: str, work: str, blocks: list[Block], runner_args: dict,
                       execute: BlockExecutor) -> Iterator[dict]:
    """Results of ``blocks`` as workers finish them (a failed block re-raises its error here).
    ``execute`` (the streamer's, handed in: this module knows nothing of plans) runs one block."""
    distributed = _distributed()
    cluster = None
    if address.startswith("local:"):
        try:
            n = int(address.split(":", 1)[1])
        except ValueError:
            n = 0
        if n < 1:
            raise SaDeployError(f"--dask local:N needs a worker count N ≥ 1, got '{address}'")
        cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                           dashboard_address=None)
    try:
        client = distributed.Client(cluster or address, timeout="30s")
    except OSError as exc:
        if cluster is not None:
            cluster.close()
        raise SaDeployError(f"--dask {address}: cannot reach the scheduler ({exc})") from exc
    try:
        client.register_plugin(RunnerPlugin(runner_args), name=PLUGIN)
        futures = [client.submit(block_task, work, block.to_dict(), execute, pure=False,
                                 key=f"block-{block.key}") for block in blocks]
        for future in distributed.as_completed(futures):
            yield future.result()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
