"""The OpenAI Responses API (``POST /v1/responses``) as a translation onto chat completions.

The proxy answers a Responses request with the same cascade and engine as a chat request (one code path
for scoring, escalation, metrics and traces): ``request`` turns the Responses body into the internal chat
request, ``reply`` turns the accepted ``chat.completion`` into a ``response`` object, and ``events`` turns
the chat chunk stream into the Responses stream events. Pure functions over dicts; imports nothing of
``app`` but ``protocol`` and ``errors``.
"""
