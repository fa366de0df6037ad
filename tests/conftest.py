import os
import sys

from hypothesis import HealthCheck, settings

# Let the test modules `import reference` whatever pytest's import mode.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

# Property tests draw structure with hypothesis and values with a seeded NumPy generator;
# they are sized to run in about a minute on 2 cores.
settings.register_profile(
    "samopt",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "samopt"))


def pytest_report_header(config: object) -> str:
    import samopt

    return f"samopt {samopt.__version__} from {os.path.dirname(samopt.__file__)}"
