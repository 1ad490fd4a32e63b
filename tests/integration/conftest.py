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
