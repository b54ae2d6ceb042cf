# megatron-core versions the tests/mcore_versions harness runs, each installed with --no-deps into
# its own target dir $(VENV)/mcore/<version> (see tests/mcore_versions/README.md), plus the small
# pure-python packages a version needs beyond the main venv, pinned.
MCORE_VERSIONS := 0.8.0 0.12.1 0.16.1
# 0.8.0's tensor_parallel/random.py does `from pkg_resources import packaging`; setuptools >= 81
# no longer ships pkg_resources.
MCORE_EXTRA_0.8.0 := setuptools==69.5.1
MCORE_EXTRA_0.12.1 :=
MCORE_EXTRA_0.16.1 :=
