"""routing-suite: find and causally test where fine-tuning installs eval/deploy-conditional behaviour."""
