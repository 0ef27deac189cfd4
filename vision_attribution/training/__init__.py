"""Training commands: dextr.py (`vision-attribution dextr-train`, the DEXTR seed's dextr_train)."""
