"""Load test for the Serve endpoint: `locust -f bench/locustfile.py --host http://127.0.0.1:8000`.

Each simulated user posts one demo face per request; EMOTION_API_TOKEN is sent when set.
"""

import os
import random
from pathlib import Path

from locust import HttpUser, between, task

FACES = sorted((Path(__file__).resolve().parents[1] / "examples" / "faces").rglob("*.jpg"))


class FaceUser(HttpUser):
    wait_time = between(0, 0.05)

    def on_start(self) -> None:
        token = os.environ.get("EMOTION_API_TOKEN")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.images = [p.read_bytes() for p in FACES]

    @task
    def predict(self) -> None:
        image = random.choice(self.images)
        self.client.post("/predict", files={"file": ("face.jpg", image, "image/jpeg")}, headers=self.headers)
