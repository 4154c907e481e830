"""Publishing: fuse exactly the chosen checkpoint into its base model, draw the run's
dashboard, write the model card. Library code for the publisher service and the CLI."""
