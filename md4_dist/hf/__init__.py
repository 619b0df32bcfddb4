"""The exported model as a Hugging Face transformers model, loadable without md4_dist:

    model = transformers.AutoModel.from_pretrained("exported/owt", trust_remote_code=True)

modeling_md4.py is the wrapper (a PretrainedConfig and a PreTrainedModel around model.Denoiser,
the schedule and sampling.generate); remote_code.py copies it and the md4_dist modules it needs
into every export. Only modeling_md4.py imports transformers.
"""
