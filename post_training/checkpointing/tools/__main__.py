from post_training.checkpointing.tools.cli import cli_main

cli_main()
