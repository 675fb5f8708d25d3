"""qsnet serve: the models over HTTP (Ray Serve + FastAPI), DICOM in and DICOM out, a browser viewer."""
