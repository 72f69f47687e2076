from lmtools.cli import main

main()
