"""A view that sends a welcome email with an HTML part and an attachment."""

from django import forms
from django.core.mail import BadHeaderError, EmailMultiAlternatives
from django.http import HttpRequest, HttpResponseNotAllowed, JsonResponse
from django.utils.html import escape

from mailworker.errors import InvalidMessageError

GETTING_STARTED = """Getting started
===============

1. Browse the shop.
2. Put something in your basket.
3. Enjoy.
"""


class WelcomeForm(forms.Form):
    """What the welcome view takes."""

    email = forms.EmailField()
    name = forms.CharField(required=False, max_length=100)


def welcome(request: HttpRequest) -> JsonResponse | HttpResponseNotAllowed:
    """POST email=...&name=...: queue a welcome email and answer 202 with its task id.

    An invalid form answers 400 with the form's errors by field, as Django reports them:
    ``{"errors": {"email": [{"message": "Enter a valid email address.", ...}]}}``. A
    message the form lets through but mailworker (or Django's mail code) refuses is a
    400 too, the error's message (it names the field) under ``"__all__"``.
    """
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    form = WelcomeForm(request.POST)
    if form.is_valid():
        address = form.cleaned_data["email"]
        name = form.cleaned_data["name"] or "there"
        message = EmailMultiAlternatives(
            subject=f"Welcome, {name}!",
            body=f"Hello {name},\n\nwelcome to the Example Shop.\n",
            to=[address],
        )
        message.attach_alternative(
            f"<h1>Hello {escape(name)},</h1><p>welcome to the <b>Example Shop</b>.</p>",
            "text/html",
        )
        message.attach("getting-started.txt", GETTING_STARTED, "text/plain")
        try:
            queued = message.send()  # returns at once: the worker sends it
        except (InvalidMessageError, BadHeaderError) as exc:
            form.add_error(None, str(exc))
        else:
            return JsonResponse(
                {"queued": queued, "task_id": message.mailworker_task_id}, status=202
            )
    return JsonResponse({"errors": form.errors.get_json_data()}, status=400)
