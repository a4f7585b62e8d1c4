"""Layer 6: what a study's numbers say (comparison) and the reports and plots made of them."""
