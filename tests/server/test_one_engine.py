"""One engine behind every dialect: the same greedy question about the same picture, asked through
OpenAI chat, OpenAI Responses, Anthropic Messages, Ollama's chat and edgevl's own API, gets the same
answer text and the same token counts."""

from __future__ import annotations

import anthropic
import ollama
import openai

from tests.server.conftest import png_b64

QUESTION = "What is in this picture?"
MAX = 12


def test_the_same_question_through_every_api_gets_the_same_answer(server):
    image = png_b64(96, 64, seed=3)
    url = f"data:image/png;base64,{image}"
    oa = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    chat = oa.chat.completions.create(model="m", max_tokens=MAX, temperature=0, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}])
    answers = {"chat": (chat.choices[0].message.content, chat.usage.prompt_tokens, chat.usage.completion_tokens)}

    resp = oa.responses.create(model="m", max_output_tokens=MAX, temperature=0, input=[{"role": "user", "content": [
        {"type": "input_image", "image_url": url}, {"type": "input_text", "text": QUESTION}]}])
    answers["responses"] = (resp.output_text, resp.usage.input_tokens, resp.usage.output_tokens)

    msg = anthropic.Anthropic(base_url=server.url, api_key="unused").messages.create(
        model="m", max_tokens=MAX, extra_body={"temperature": 0}, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": image}},
            {"type": "text", "text": QUESTION}]}])
    answers["messages"] = ("".join(b.text for b in msg.content if b.type == "text"), msg.usage.input_tokens,
                           msg.usage.output_tokens)

    r = ollama.Client(host=server.url).chat(model="m", options={"num_predict": MAX, "temperature": 0}, messages=[
        {"role": "user", "content": QUESTION, "images": [image]}])
    answers["ollama"] = (r.message.content, r.prompt_eval_count, r.eval_count)

    with server.client() as c:
        p = c.post("/api/predict", json={"image": image, "prompt": QUESTION, "max_tokens": MAX,
                                         "temperature": 0}).json()
    answers["predict"] = (p["answer"], p["usage"]["prompt_tokens"], p["usage"]["completion_tokens"])

    assert len(set(answers.values())) == 1, answers
    text, prompt_tokens, completion_tokens = answers["chat"]
    assert text and prompt_tokens > 20 and completion_tokens > 0
