"""A view that sends a welcome email with an HTML part and an attachment."""

from django.core.mail import EmailMultiAlternatives
from django.http import HttpRequest, HttpResponseNotAllowed, JsonResponse
from django.utils.html import escape

GETTING_STARTED = """Getting started
===============

1. Browse the shop.
2. Put something in your basket.
3. Enjoy.
"""


def welcome(request: HttpRequest) -> JsonResponse | HttpResponseNotAllowed:
    """POST email=...&name=...: queue a welcome email and answer 202 with its task id."""
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    address = request.POST["email"]
    name = request.POST.get("name", "there")
    message = EmailMultiAlternatives(
        subject=f"Welcome, {name}!",
        body=f"Hello {name},\n\nwelcome to the Example Shop.\n",
        to=[address],
    )
    message.attach_alternative(
        f"<h1>Hello {escape(name)},</h1><p>welcome to the <b>Example Shop</b>.</p>", "text/html"
    )
    message.attach("getting-started.txt", GETTING_STARTED, "text/plain")
    queued = message.send()  # returns at once: the worker sends it
    return JsonResponse({"queued": queued, "task_id": message.mailworker_task_id}, status=202)
