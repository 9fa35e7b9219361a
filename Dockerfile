# advpt in a container: this repository's pyproject.toml installed with plain `pip install .` into a
# PyTorch CUDA image whose torch/torchvision already satisfy it, run as a non-root user.
#   docker build -t advpt .
#   docker run --gpus all --shm-size=16g -v "$PWD/outputs:/work/outputs" advpt pretrain method=mae attack=l2 eps=0.5 \
#       model=vit_base_patch16 trainer.devices=8 trainer.strategy=ddp trainer.precision=bf16-mixed
FROM pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /opt/advpt
COPY pyproject.toml README.md ./
COPY advpt ./advpt
COPY conf ./conf
RUN pip install . && useradd --create-home --uid 1000 advpt && mkdir -p /work && chown advpt /work
USER advpt
WORKDIR /work
ENTRYPOINT ["advpt"]
CMD ["pretrain"]
