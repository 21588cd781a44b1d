# The two commands of the README:
#   make demo   set up, then run the bundled demo guest
#   make test   set up (with QEMU for differential tests), then run the whole test suite
.PHONY: demo test bench lint

demo:
	scripts/setup.sh
	@# the demo guest ends through isa-debug-exit with value 0, i.e. exit status 1 (QEMU's convention)
	.venv/bin/hvm run --stats || test $$? -eq 1

test:
	scripts/setup.sh test
	.venv/bin/ruff check hvm tests benchmarks
	.venv/bin/python -m pytest -q -ra

bench:
	scripts/setup.sh test
	.venv/bin/python benchmarks/exit_cost.py
	.venv/bin/python benchmarks/model_speed.py
