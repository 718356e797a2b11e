"""The timeline: what a treating provider may see of a patient, and the rules for it."""
