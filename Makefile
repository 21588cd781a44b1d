# The two commands of the README:
#   make demo   set up, then run the bundled demo guest
#   make test   set up (with QEMU for differential tests), then run the whole test suite
.PHONY: demo test bench lint

demo:
	scripts/setup.sh
	.venv/bin/hvm run --stats

test:
	scripts/setup.sh test
	.venv/bin/ruff check hvm tests benchmarks
	.venv/bin/python -m pytest -q -ra

bench:
	scripts/setup.sh test
	.venv/bin/python benchmarks/exit_cost.py
