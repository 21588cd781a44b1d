from hvm.cli import entry

entry()
