"""Tests of the apps inside the test process: the test client, the database, the gateway
under uvicorn in a thread and the fake OpenRouter."""
