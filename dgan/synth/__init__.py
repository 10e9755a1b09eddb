"""Synthesis at scale: defect sets with masks, restored normals and a manifest (Sec. 4.2).

plan.py decides what image i is; output.py owns the resumable on-disk set; run.py is the
pipeline and `dgan synth`.
"""
