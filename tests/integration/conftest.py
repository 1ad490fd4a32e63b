import pytest
import ray


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for the integration tests: 8 logical CPUs on a 2-core box, so
    the fleets of several tests fit at once."""
    if not ray.is_initialized():
        ray.init(num_cpus=8, namespace="fd_ray_sync", include_dashboard=False)
    yield
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    """test_ray_job_submit.py disconnects the session from its Ray instance (it runs a head
    of its own): run it after every other test, whatever the file names."""
    last = [i for i in items if i.path.name == "test_ray_job_submit.py"]
    items[:] = [i for i in items if i.path.name != "test_ray_job_submit.py"] + last
