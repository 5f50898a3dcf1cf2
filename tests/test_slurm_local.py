"""bin/slurm-local: a one-node Slurm cluster on localhost with four fake GPUs.

The cluster is brought up once for this module and left running for the other Slurm tests. Every
client command runs without SLURM_CONF (and without any inherited SLURM_* variable), as from a
fresh shell: that /etc/slurm/slurm.conf leads to the cluster is part of what is tested.
"""

import os
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM_LOCAL = REPO / "bin" / "slurm-local"
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
JOB_TIMEOUT_S = 120

pytestmark = [
    pytest.mark.slurm,
]


def _plain_env():
    """The environment of a fresh shell: no SLURM_CONF, no variables of an enclosing job."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}


def _run(args, **kwargs):
    return subprocess.run(args, env=_plain_env(), capture_output=True, text=True,
                          timeout=JOB_TIMEOUT_S, **kwargs)


def _slurm_local(subcommand):
    return _run([str(SLURM_LOCAL), subcommand])


@pytest.fixture(scope="module")
def cluster(slurm_cluster):
    """`bin/slurm-local up`'s finished process (see ``slurm_cluster``); the cluster stays up after the tests."""
    return slurm_cluster


def _sbatch_wait(script, workdir):
    """Submit `script` (text of a batch script), wait for the job; return (job id, its output)."""
    path = workdir / "job.sh"
    path.write_text(script)
    done = _run(["sbatch", "--wait", "--parsable", f"--output={workdir}/job-%j.out", str(path)],
                cwd=workdir)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip().split(";")[0]
    return job_id, (workdir / f"job-{job_id}.out").read_text()


def _scontrol_job_fields(job_id):
    shown = _run(["scontrol", "show", "job", "--oneliner", job_id])
    assert shown.returncode == 0, shown.stderr
    return dict(field.split("=", 1) for field in shown.stdout.split() if "=" in field)


def _daemon_lines(status):
    """The 'daemon: running (pid N)' lines of `bin/slurm-local status`."""
    return [line for line in status.stdout.splitlines() if ": " in line]


def _tagged_lines(output, tag):
    """{SLURM_LOCALID: CUDA_VISIBLE_DEVICES} from the lines 'tag LOCALID DEVICES'."""
    rows = [line.split() for line in output.splitlines() if line.startswith(tag + " ")]
    return {int(row[1]): row[2] for row in rows}


def test_mpich_ranks_talk_through_pmi2(cluster, tmp_path):
    assert VENV_PYTHON.exists(), f"no virtualenv python at {VENV_PYTHON}: run bin/setup"
    hello = "from mpi4py import MPI; print(MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size())"
    job_id, output = _sbatch_wait(
        "#!/bin/bash\n"
        "#SBATCH --ntasks=2\n"
        f'srun --mpi=pmi2 -n 2 {VENV_PYTHON} -c "{hello}"\n',
        tmp_path)
    # Two independent singletons would print "0 1" twice.
    assert sorted(output.splitlines()) == ["0 2", "1 2"], output

    fields = _scontrol_job_fields(job_id)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0")
    # No accounting database: sacct reads the job-completion log.
    sacct = _run(["sacct", "-c", "-j", job_id, "-n", "-P", "-o", "JobID,State,ExitCode"])
    assert sacct.returncode == 0, sacct.stderr
    assert f"{job_id}|COMPLETED|0:0" in sacct.stdout.splitlines(), sacct.stdout


def test_fake_gpus_are_bound_per_rank(cluster, tmp_path):
    show = "echo {tag} $SLURM_LOCALID $CUDA_VISIBLE_DEVICES"
    job_id, output = _sbatch_wait(
        "#!/bin/bash\n"
        "#SBATCH --nodes=1 --ntasks-per-node=4 --cpus-per-task=1 --gpus-per-node=4\n"
        f"srun --gpus-per-task=1 bash -c '{show.format(tag='per-task')}'\n"
        f"srun bash -c '{show.format(tag='shared')}'\n",
        tmp_path)
    assert _scontrol_job_fields(job_id)["JobState"] == "COMPLETED", output

    per_task = _tagged_lines(output, "per-task")
    assert sorted(per_task) == [0, 1, 2, 3], output
    assert sorted(per_task.values()) == ["0", "1", "2", "3"], output
    assert _tagged_lines(output, "shared") == {rank: "0,1,2,3" for rank in range(4)}, output


def test_second_up_is_a_fast_no_op(cluster):
    before = _slurm_local("status")
    started = time.monotonic()
    again = _slurm_local("up")
    elapsed = time.monotonic() - started
    assert again.returncode == 0, again.stderr
    assert elapsed < 5, f"second up took {elapsed:.1f} s:\n{again.stderr}"
    assert "started" not in again.stderr and "stopping" not in again.stderr, again.stderr
    assert _daemon_lines(_slurm_local("status")) == _daemon_lines(before)  # same PIDs


def test_status_reports_running_daemons(cluster):
    status = _slurm_local("status")
    assert status.returncode == 0, status.stdout + status.stderr
    lines = status.stdout.splitlines()
    for daemon in ("munged", "slurmctld", "slurmd"):
        assert any(line.startswith(f"{daemon}: running (pid ") for line in lines), status.stdout
    node = os.uname().nodename.split(".")[0]
    assert any(line.startswith("debug*") and line.endswith(node) for line in lines), status.stdout


def test_unknown_subcommand_prints_usage():
    wrong = _slurm_local("start")
    assert wrong.returncode == 2
    assert "usage:" in wrong.stderr
