"""Reference implementations of InternVL preprocessing, written in upstream's own style from spec/internvl.md §3
(`dynamic_preprocess`/`find_closest_aspect_ratio`, `build_transform`, `preprocess_internvl2_5` in
IV/train/dataset.py). Tests compare the port against these; they intentionally follow upstream's structure."""
import numpy as np
import torch
from PIL import Image

IGNORE_TOKEN_ID = -100


def find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float('inf')
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def target_ratios_for(min_num, max_num):
    target_ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1) if
        i * j <= max_num and i * j >= min_num)
    return sorted(target_ratios, key=lambda x: x[0] * x[1])


def dynamic_preprocess(image, min_num=1, max_num=6, image_size=448, use_thumbnail=False):
    orig_width, orig_height = image.size
    aspect_ratio = orig_width / orig_height
    target_ratios = target_ratios_for(min_num, max_num)
    target_aspect_ratio = find_closest_aspect_ratio(aspect_ratio, target_ratios, orig_width, orig_height, image_size)
    target_width = image_size * target_aspect_ratio[0]
    target_height = image_size * target_aspect_ratio[1]
    blocks = target_aspect_ratio[0] * target_aspect_ratio[1]
    resized_img = image.resize((target_width, target_height))
    processed_images = []
    for i in range(blocks):
        box = ((i % (target_width // image_size)) * image_size,
               (i // (target_width // image_size)) * image_size,
               ((i % (target_width // image_size)) + 1) * image_size,
               ((i // (target_width // image_size)) + 1) * image_size)
        processed_images.append(resized_img.crop(box))
    assert len(processed_images) == blocks
    if use_thumbnail and len(processed_images) != 1:
        processed_images.append(image.resize((image_size, image_size)))
    return processed_images


def build_transform(input_size):
    # torchvision is not installed here: the same four steps (RGB, Resize BICUBIC, ToTensor, Normalize) by hand.
    mean = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)

    def transform(img):
        img = img.convert('RGB') if img.mode != 'RGB' else img
        img = img.resize((input_size, input_size), Image.BICUBIC)
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
        return (x - mean) / std
    return transform


def load_image(image, input_size=448, max_num=12):
    transform = build_transform(input_size)
    images = dynamic_preprocess(image.convert('RGB'), image_size=input_size, use_thumbnail=True, max_num=max_num)
    return torch.stack([transform(im) for im in images])  # [N, 3, H, W]


def preprocess_internvl2_5(sources, tokenizer, num_image_token_list, system_message, model_max_length,
                           num_image=1):
    conversations = [dict(c) for c in sources[0]]
    if conversations[0]['from'] == 'system':
        system_prompt = conversations[0]['value']
        conversations = conversations[1:]
    else:
        system_prompt = system_message
    new_conversations = []
    current_image_idx = 0
    for conversation in conversations:
        if conversation['from'] == 'human':
            image_cnt = conversation['value'].count('<image>')
            for _ in range(image_cnt):
                if current_image_idx == num_image:
                    break
                image_tokens = f"<img>{'<IMG_CONTEXT>' * num_image_token_list[current_image_idx]}</img>"
                conversation['value'] = conversation['value'].replace('<image>', image_tokens, 1)
                current_image_idx += 1
        new_conversations.append(conversation)
    conversations = new_conversations
    assert current_image_idx == num_image

    batches, roles = [], []
    if system_prompt is not None:
        batches.append(f'<|im_start|>system\n{system_prompt}<|im_end|>\n')
        roles.append('system')
    for conversation in conversations:
        if conversation['from'] == 'human':
            batches.append(f'<|im_start|>user\n{conversation["value"]}<|im_end|>\n')
            roles.append('human')
        elif conversation['from'] == 'gpt':
            batches.append(f'<|im_start|>assistant\n{conversation["value"]}<|im_end|>\n')
            roles.append('gpt')
        else:
            raise NotImplementedError
    input_ids = [np.asarray(x) for x in tokenizer(batches, padding=False, truncation=False).input_ids]
    final_input_ids, final_targets = [], []
    ignore_ids = tokenizer('<|im_start|>assistant\n', return_tensors='np').input_ids[0]
    ignore_len = ignore_ids.shape[0]
    for role, input_id in zip(roles, input_ids):
        final_input_ids.append(input_id)
        if role in ('system', 'human'):
            final_targets.append(np.full(input_id.shape, IGNORE_TOKEN_ID))
        else:
            target = input_id.copy()
            target[:ignore_len] = IGNORE_TOKEN_ID
            target[-1:] = IGNORE_TOKEN_ID
            final_targets.append(target)
    input_ids = torch.tensor(np.concatenate(final_input_ids))[:model_max_length]
    targets = torch.tensor(np.concatenate(final_targets))[:model_max_length]
    padding_length = model_max_length - input_ids.size(0)
    input_ids = torch.nn.functional.pad(input_ids, (0, padding_length), value=tokenizer.pad_token_id)
    targets = torch.nn.functional.pad(targets, (0, padding_length), value=IGNORE_TOKEN_ID)
    return dict(input_ids=input_ids, labels=targets, attention_mask=input_ids.ne(tokenizer.pad_token_id))
